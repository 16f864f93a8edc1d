from real_megatron.cli import main

# the guard matters: reward workers and checkpoint writers are spawned processes that re-import
# the main module, and must not start another run
if __name__ == "__main__":
    raise SystemExit(main())
