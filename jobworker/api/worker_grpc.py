import purerpc
from . import worker_pb2 as worker__pb2


class JobServiceServicer(purerpc.Servicer):
    async def CreateJob(self, input_message):
        raise NotImplementedError()

    async def GetJob(self, input_message):
        raise NotImplementedError()

    async def StopJob(self, input_message):
        raise NotImplementedError()

    async def GetJobs(self, input_message):
        raise NotImplementedError()

    async def GetJobsStream(self, input_message):
        raise NotImplementedError()

    async def ListJobs(self, input_message):
        raise NotImplementedError()

    async def DeleteJob(self, input_message):
        raise NotImplementedError()

    @property
    def service(self) -> purerpc.Service:
        service_obj = purerpc.Service(
            "job_worker.JobService"
        )
        service_obj.add_method(
            "CreateJob",
            self.CreateJob,
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                worker__pb2.CreateJobReq,
                worker__pb2.CreateJobRes,
            )
        )
        service_obj.add_method(
            "GetJob",
            self.GetJob,
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                worker__pb2.GetJobReq,
                worker__pb2.GetJobRes,
            )
        )
        service_obj.add_method(
            "StopJob",
            self.StopJob,
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                worker__pb2.StopJobReq,
                worker__pb2.StopJobRes,
            )
        )
        service_obj.add_method(
            "GetJobs",
            self.GetJobs,
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                worker__pb2.EmptyRequest,
                worker__pb2.Jobs,
            )
        )
        service_obj.add_method(
            "GetJobsStream",
            self.GetJobsStream,
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_STREAM,
                worker__pb2.GetJobsStreamReq,
                worker__pb2.DataChunk,
            )
        )
        service_obj.add_method(
            "ListJobs",
            self.ListJobs,
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                worker__pb2.ListJobsReq,
                worker__pb2.ListJobsRes,
            )
        )
        service_obj.add_method(
            "DeleteJob",
            self.DeleteJob,
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                worker__pb2.DeleteJobReq,
                worker__pb2.DeleteJobRes,
            )
        )
        return service_obj


class JobServiceStub:
    def __init__(self, channel):
        self._client = purerpc.Client(
            "job_worker.JobService",
            channel
        )
        self.CreateJob = self._client.get_method_stub(
            "CreateJob",
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                worker__pb2.CreateJobReq,
                worker__pb2.CreateJobRes,
            )
        )
        self.GetJob = self._client.get_method_stub(
            "GetJob",
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                worker__pb2.GetJobReq,
                worker__pb2.GetJobRes,
            )
        )
        self.StopJob = self._client.get_method_stub(
            "StopJob",
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                worker__pb2.StopJobReq,
                worker__pb2.StopJobRes,
            )
        )
        self.GetJobs = self._client.get_method_stub(
            "GetJobs",
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                worker__pb2.EmptyRequest,
                worker__pb2.Jobs,
            )
        )
        self.GetJobsStream = self._client.get_method_stub(
            "GetJobsStream",
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_STREAM,
                worker__pb2.GetJobsStreamReq,
                worker__pb2.DataChunk,
            )
        )
        self.ListJobs = self._client.get_method_stub(
            "ListJobs",
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                worker__pb2.ListJobsReq,
                worker__pb2.ListJobsRes,
            )
        )
        self.DeleteJob = self._client.get_method_stub(
            "DeleteJob",
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                worker__pb2.DeleteJobReq,
                worker__pb2.DeleteJobRes,
            )
        )