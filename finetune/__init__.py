"""MMAction2 config presets for ``sfdeploy finetune --preset NAME``.

Each ``<name>.py`` here is a plain MMAction2 config that you can read, copy and use with
MMAction2's own tools. This folder installs as ``sfdeploy.presets`` so that sfdeploy finds the
presets from a wheel install as well as from a checkout; nothing here is imported as code.
"""
