"""What the model sees: explanations, embeddings, similar images, label issues. Between inference and evaluation:
it uses a trained model (inference, models) on images (data); evaluation and train call it for their reports.

    network         a model file split at its last residual stage (trunk: image -> maps; head: maps -> logits)
    cam             Grad-CAM, Grad-CAM++ and LayerCAM from the maps and the head; peak_xy; the overlay PNG
    batches         inputs to decoded batches, a bounded number ahead of the model
    explain         rescli explain: a heatmap overlay and a row per input and label
    embed           rescli embed: pooled penultimate features, streamed
    embeddings_file embedding files (.npy + paths, .parquet, .jsonl) written and read
    similar         rescli similar: exact nearest neighbours (scikit-learn, or faiss above a size)
    label_issues    rescli label-issues: cross-validated heads on backbone features, then confident learning
    reports         the hooks evaluation and finetune's report call: heatmaps of mistakes, validation suspects
"""
