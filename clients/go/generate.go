package idemd

// The stubs in idempotencyv1/ are generated from ../../proto and committed; TestStubsAreUpToDate
// fails when they differ from what the pinned generators make of the proto now. Regenerate with
// `go generate` after installing protoc (Debian's protobuf-compiler) and the plugins at the
// versions .ci/run pins:
//
//	go install google.golang.org/protobuf/cmd/protoc-gen-go@v1.36.12
//	go install google.golang.org/grpc/cmd/protoc-gen-go-grpc@v1.6.2

//go:generate protoc -I ../../proto --go_out=. --go_opt=module=github.com/idemd/idemd/clients/go --go-grpc_out=. --go-grpc_opt=module=github.com/idemd/idemd/clients/go idempotency/v1/idempotency.proto
