"""Local AWS (moto server or in-process moto) built from infra/template.yaml."""
