"""Model families: data, network, training loop and ONNX export, one file each.

Importing these modules needs the ``train`` extra (torch). The serving side never does.
"""
