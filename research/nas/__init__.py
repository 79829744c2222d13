"""Zero-shot NAS: the NB201 cell space (``nb201``), training-free proxies (``proxies``), and
scoring many cells at once (``scoring``)."""
