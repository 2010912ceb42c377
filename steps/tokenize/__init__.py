"""The tokenize step (``step.tokenize_dataset``): the train/eval split (``split``), chat encoding
with the model's template (``chats``, ``template``, ``encode``) and optional augmentation (``augment``)."""
