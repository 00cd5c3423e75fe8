from pipeline.audit import AuditConfig, run
from pipeline.config import stage_main

main = stage_main("audit", AuditConfig)(run)

if __name__ == "__main__":
    main()
