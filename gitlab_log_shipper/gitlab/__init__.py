"""Where pipelines come from: reading GitLab (REST through python-gitlab; the throttle; bounded job-log downloads).

May use the package's edge modules (config, errors, security, spool, timeutil); never delivery, state or the
document builders. ``rest`` is the only module of the package that imports python-gitlab.
"""
