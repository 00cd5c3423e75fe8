from pipeline.config import stage_main
from pipeline.evaluate import EvalConfig, run

main = stage_main("evaluate", EvalConfig)(run)

if __name__ == "__main__":
    main()
