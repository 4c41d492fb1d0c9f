"""AWS resources of callbridge: the CloudFormation template (template.yaml) and the local stack."""
