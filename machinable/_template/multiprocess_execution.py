from multiprocessing import Pool

from machinable import Execution


def run(experiment):
    experiment()


class Multiprocess(Execution):
    class Config:
        processes: int = 1

    def on_dispatch(self):
        with Pool(processes=self.config.processes, maxtasksperchild=1) as pool:
            pool.map(run, self.experiments)  # experiment() runs in a worker
