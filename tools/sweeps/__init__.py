"""The sweep launcher's parts: the points of a sweep (``points``), how a finished point is
reported (``progress``) and the engines that run them (``local``, ``ray_engine``, ``tpu_pod``).
``tools/sweep.py`` is the command line over them; ``tools/collect.py`` tabulates the results."""
