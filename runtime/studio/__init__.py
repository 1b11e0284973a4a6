"""The sketch studio: draw in the browser, see the render, on any bundle and backend.

    sdkiln studio --model artifacts/tiny            # then open http://127.0.0.1:7860

- ``engine``: the model side, no gradio: ``Studio`` loads the bundle once per (backend, section) and
  renders ``RenderInputs`` with the runtime's own request builders (same inputs, same image as
  ``sdkiln run``), with a TAESD preview where the bundle has both decoders.
- ``live``: per-page request tokens: debounced live re-rendering, newer requests supersede older ones.
- ``app``: the Gradio page (imports gradio); ``serve``: load, build, serve; ``cli``: ``sdkiln studio``.

Needs the ``studio`` extra (``pip install 'sdkiln[studio]'``) only for ``app`` and ``serve``; importing
this package imports neither gradio nor torch.
"""
