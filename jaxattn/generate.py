"""``python -m jaxattn.generate``: the batch generation CLI (:mod:`jaxattn.serve.generate`).

Kept at the top of the namespace only as a command name; the code lives in ``serve/``.
"""

if __name__ == "__main__":
    import runpy

    runpy.run_module("jaxattn.serve.generate", run_name="__main__", alter_sys=True)
