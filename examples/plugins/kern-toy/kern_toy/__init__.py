"""kern-toy: a tiny diffusion transformer, the worked example of a third-party kern plugin."""
