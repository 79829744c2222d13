"""X-EcoMLA: upcycling a pretrained GQA model into MLA (``upcycle``) and fitting the upcycled layers
to the teacher's (``reconstruct``). Imports models and attention; neither imports it."""
