"""Where parameters come from and go to: checkpoint formats, published weights on the Hugging
Face Hub, conversion to and from open_clip, and the factory that builds a model with them."""
