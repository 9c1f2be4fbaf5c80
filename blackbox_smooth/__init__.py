"""bbsmooth: certified robustness for black-box image classifiers."""
