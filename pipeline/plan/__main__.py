from pipeline.config import stage_main
from pipeline.plan import PlanConfig, run

main = stage_main("plan", PlanConfig)(run)

if __name__ == "__main__":
    main()
