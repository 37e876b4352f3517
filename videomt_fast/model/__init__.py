"""The model: configs, plain-PyTorch modules that call ops, weight loading. Nothing of the runtime."""
