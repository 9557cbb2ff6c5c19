"""coca-edge: small, fast, validated CoCa models for edge devices."""
__version__ = "0.1.0"
