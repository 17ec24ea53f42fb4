"""fedbench: backdoor attacks vs robust aggregation in non-IID federated learning."""

__version__ = "0.1.0"
