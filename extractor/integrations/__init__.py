"""The job as orchestrators run it. Each module imports only the standard library and
extractor.errors, so an orchestrator's environment needs neither torch nor this package's
dependencies: the job itself runs as a command, from whatever environment holds it.

    airflow.py    one shard as an Airflow task: the command, what its exit code means, the summary for XCom
"""
