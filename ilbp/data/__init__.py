"""Input pipelines: image classification (TFDS, scikit-learn digits) and language modelling."""
