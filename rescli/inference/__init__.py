"""Using a trained model: find it, open it as a Predictor, label images with it, export it, describe it.

    lookup              which model file (--model, $RESCLI_MODEL, the newest run); how a file opens, by its name
    predictor           Predictor, the inference core predict, evaluate and finetune share: images in, logits out
    load                a model file as a Predictor (checkpoints here; exports through their format's module)
    scores              logits to result rows: calibrated scores, top-k, the unknown threshold
    inputs              predict's inputs to paths (files, folders, globs, stdin, @lists), and one image decoded
    jpeg                plain JPEGs decoded in batches by torchvision (nvJPEG on a GPU)
    stream              predict_batches: results in input order, with a bounded lookahead of decoded images
    export              rescli export: a checkpoint to an export file, checked for parity
    export_format       the metadata every export carries and the signature it must have
    torchscript_export  TorchScript exports: written, opened as a Predictor, described
    onnx_export         ONNX exports: written, opened as a Predictor (onnxruntime), described
    describe            rescli info: what a checkpoint or an export holds
"""
