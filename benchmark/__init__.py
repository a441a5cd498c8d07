"""The runner: model + data -> activations -> train -> evaluate -> results -> report."""
