from pipeline.config import stage_main
from pipeline.interpret import InterpretConfig, run

main = stage_main("interpret", InterpretConfig)(run)

if __name__ == "__main__":
    main()
