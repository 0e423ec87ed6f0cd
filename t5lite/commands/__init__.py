"""t5lite.commands: the `t5lite` verbs (the command-line edge; the only place besides gin/ where
gin is bound).

common.py       each verb's own flag registry and the flags several verbs share (defined once)
gin_setup.py    --gin_file / --gin.NAME=VALUE: parse gin, build the configured dataclasses
<verb>.py       one module per verb (train, eval, infer, data, vocab, import_model, export_model,
                info, plan): its flags in `FLAGS` and `main()` (`main(gin_bindings)` if it
                reads gin)

Dispatch, the unexpected-argument check and bad-flag errors live in `t5lite.cli`.
"""
