"""The Flower runtime: a ServerApp and a ClientApp (flwr Message API) that move the same
Updates as the in-process runtime, over a real SuperLink and SuperNodes or Flower's simulation
engine. See docs/flower.md.

Nothing heavy is imported here: the ClientApp process of a SuperNode starts for every message,
and a query must not pay for torch.
"""
