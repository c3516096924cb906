"""Command-line tools: ``dkv`` (certs, and later dev/envoy-bootstrap) and ``dkvctl``."""
