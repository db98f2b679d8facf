"""The offline world: generated images (``generate``), the pretraining of its small CLIP
(``pretrain``) and the ``fedpgp world`` commands (``commands``)."""
