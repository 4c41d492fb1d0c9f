"""SalesRender CRM: the GraphQL client and the mapping of callbridge leads to orders."""
