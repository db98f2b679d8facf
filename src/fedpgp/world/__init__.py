"""The offline world's own CLIP: its pretraining (``pretrain``, ``model``) and the ``fedpgp world``
commands (``commands``). The world's images are a dataset (fedpgp.data.world_images and the
``world`` loader)."""
