"""e8: its standard-flavour graph is not written yet."""

OPSET = 18


def check(qz):
    raise ValueError("e8 has no standard-flavour ONNX graph yet; export it with flavour='custom'")
