"""Services: a thin layer over containers (Shepherd's make-forkexec-constructor/container)."""
