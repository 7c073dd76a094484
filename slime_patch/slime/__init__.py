"""Mirror of upstream slime's layout; only the module files below are copied by the installer."""
