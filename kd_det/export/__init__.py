"""From a kd_det checkpoint to what a user deploys: plain detectron2 files, TorchScript, ONNX.

* :mod:`.student`: the student's weights and config as a vanilla detectron2 checkpoint (the
  distillation parts dropped), refusing weights that do not match the config.
* :mod:`.members`: one member (peer or EMA teacher) of an online-distillation model, as a student.
* :mod:`.deploy`: trace an exported student to TorchScript or ONNX and check it against eager.
"""
