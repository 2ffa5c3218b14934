"""The served MoE layer: router -> dispatch -> experts -> combine, and the peer baselines measured against it."""
