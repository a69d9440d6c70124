"""faultwatch.bench: evaluation on labelled data (``eval``), speed benchmarks (``bench``)
and the ``demo``. Needs the ``train`` extra (it trains and exports the models it measures).
"""
