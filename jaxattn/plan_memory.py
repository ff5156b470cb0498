"""``python -m jaxattn.plan_memory``: the memory planner CLI (:mod:`jaxattn.serve.plan_memory`).

Kept at the top of the namespace only as a command name; the code lives in ``serve/``.
"""

if __name__ == "__main__":
    import runpy

    runpy.run_module("jaxattn.serve.plan_memory", run_name="__main__", alter_sys=True)
