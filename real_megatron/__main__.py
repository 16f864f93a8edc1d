from real_megatron.cli import main

raise SystemExit(main())
