"""The gateway: routes the public KV API to shard leaders and configures Envoy over xDS."""
