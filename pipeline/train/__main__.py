from pipeline.config import stage_main
from pipeline.train import TrainConfig, train

main = stage_main("train", TrainConfig)(train)

if __name__ == "__main__":
    main()
