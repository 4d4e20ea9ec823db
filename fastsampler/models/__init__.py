"""What evaluation and tuning both need of a model, below both of them (``ARCHITECTURE.md``).

* ``denoisers`` — a pipeline's network (with classifier-free guidance and its conditions) as ``model(x, t)``:
  ``from_pipeline``, ``UNetDenoiser``, ``TextUNetDenoiser``, ``SD3Denoiser``, ``MixtureDenoiserModel``;
* ``conditions`` — what a sampling run conditions its samples on (labels, prompts) and the model that draws them;
* ``digits`` — the embedded digits dataset and its trained pipelines and classifier (``fastsampler/assets``);
* ``digits_pipeline`` — ``DigitsConditionalPipeline``, the class-conditional pipeline diffusers loads by name;
* ``features`` — the digits CNN: the classifier and the FID feature extractor of the digits benchmark.
"""
