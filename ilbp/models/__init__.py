"""Model families, each exposing its stages and auxiliary heads as separate Flax modules."""
