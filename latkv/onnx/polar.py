"""polar: its standard-flavour graph is not written yet."""

OPSET = 18


def check(qz):
    raise ValueError("polar has no standard-flavour ONNX graph yet; export it with flavour='custom'")
