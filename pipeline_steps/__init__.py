"""The containerized steps: one module per node of the DAG and stage of ``dvc.yaml``.

Each module has ``run(params[, item]) -> report``: it reads its inputs, computes, writes its outputs
under ``params.out_dir`` (paths from grappa/io/layout.py) and returns its report. The runner
(``grappa <verb>``, grappa/cli.py) writes that report to the file the step registry declares
(``<folder>/report.json``) and tracking logs it. Steps import the library (``grappa``), never each other.
"""
