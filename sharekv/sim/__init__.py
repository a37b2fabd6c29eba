"""A discrete-event cluster simulator whose replicas run the real scheduler, KV manager and prefix cache,
with a roofline cost model of a hardware profile in place of the forward pass."""
