// cri-driver: a grpc-go CRI client for dockhand's integration tests. It connects to one CRI
// socket and runs the calls it reads on stdin, one JSON object a line, printing one JSON result
// a line on stdout, in order (so a test can use one call's answer in the next).
//
// A call names a RuntimeService method and carries its request as protobuf bytes (base64), so
// the test encodes every request itself. Two clients make unary calls:
//   - "kubelet": kubelet's own client, k8s.io/cri-client remote.NewRemoteRuntimeService
//     (authority "localhost", 16 MiB answers, its own timeouts);
//   - "grpc": a plain grpc-go connection invoking the method path with the bytes as they are.
//
// Ops other than "call" ("stream_start", "stream_end", "stall") shape what a unary helper cannot:
// a server stream read in the background (GetContainerEvents through kubelet's client is its
// RuntimeService.GetContainerEvents, as kubelet's evented PLEG calls it; other streams and clients
// are grpc-go's), and a slow reader (its own connection with a small flow-control window, calls
// started and never read).
package main

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	internalapi "k8s.io/cri-api/pkg/apis"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
	remote "k8s.io/cri-client/pkg"
)

const (
	service   = "/runtime.v1.RuntimeService/"
	maxMsg    = 16 << 20
	kubeletTO = 2 * time.Minute
)

// Call is one line of input.
type Call struct {
	// "call" (default), "stream_start", "stream_end", "stall".
	Op string `json:"op"`
	// "kubelet" or "grpc" (calls and streams); stalls always use grpc-go directly.
	Client string `json:"client"`
	// Method name, e.g. "ContainerStatus".
	Method  string `json:"method"`
	Request []byte `json:"request"` // base64 in JSON
	// Per-call deadline (grpc client and streams); 0: 30 s.
	TimeoutMs int `json:"timeout_ms"`
	// Stream name (stream_start/stream_end).
	Name string `json:"name"`
	// stall: how many calls, and the window of the stalled connection (stream and connection).
	Count  int   `json:"count"`
	Window int32 `json:"window"`
}

// Result is one line of output.
type Result struct {
	Code      uint32   `json:"code"`
	Message   string   `json:"message"`
	Response  []byte   `json:"response,omitempty"`
	Responses [][]byte `json:"responses,omitempty"`
	ElapsedMs int64    `json:"elapsed_ms"`
	// A failure of the driver itself (bad input), not of the call.
	Error string `json:"error,omitempty"`
}

type rawCodec struct{}

func (rawCodec) Marshal(v any) ([]byte, error) { return *(v.(*[]byte)), nil }
func (rawCodec) Unmarshal(data []byte, v any) error {
	*(v.(*[]byte)) = append([]byte(nil), data...)
	return nil
}
func (rawCodec) Name() string { return "proto" }

type stream struct {
	done   chan struct{}
	cancel context.CancelFunc
	result Result
}

type driver struct {
	socket  string
	kubelet internalapi.RuntimeService
	conn    *grpc.ClientConn
	streams map[string]*stream
	// Slow readers stay open (and unread) until the driver exits.
	stalled []*grpc.ClientConn
}

func main() {
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: cri-driver <socket> < calls.jsonl")
		os.Exit(2)
	}
	d := &driver{socket: os.Args[1], streams: map[string]*stream{}}
	in := bufio.NewReaderSize(os.Stdin, 1<<20)
	out := json.NewEncoder(os.Stdout)
	var mu sync.Mutex
	for {
		line, err := in.ReadBytes('\n')
		if len(line) > 0 {
			var call Call
			var result Result
			if jerr := json.Unmarshal(line, &call); jerr != nil {
				result = Result{Error: "bad input: " + jerr.Error()}
			} else {
				result = d.run(call)
			}
			mu.Lock()
			_ = out.Encode(result)
			mu.Unlock()
		}
		if err == io.EOF {
			return
		}
		if err != nil {
			fmt.Fprintln(os.Stderr, "read stdin:", err)
			os.Exit(1)
		}
	}
}

func (d *driver) run(call Call) Result {
	start := time.Now()
	var result Result
	switch call.Op {
	case "", "call":
		switch call.Client {
		case "kubelet":
			result = d.kubeletCall(call)
		case "grpc":
			result = d.grpcCall(call)
		default:
			result = Result{Error: fmt.Sprintf("unknown client %q", call.Client)}
		}
	case "stream_start":
		if call.Client == "kubelet" {
			result = d.kubeletStreamStart(call)
		} else {
			result = d.streamStart(call)
		}
	case "stream_end":
		s, ok := d.streams[call.Name]
		if !ok {
			return Result{Error: fmt.Sprintf("no stream %q", call.Name)}
		}
		s.cancel()
		<-s.done
		delete(d.streams, call.Name)
		return s.result
	case "stall":
		result = d.stall(call)
	default:
		result = Result{Error: fmt.Sprintf("unknown op %q", call.Op)}
	}
	result.ElapsedMs = time.Since(start).Milliseconds()
	return result
}

func timeout(call Call) time.Duration {
	if call.TimeoutMs > 0 {
		return time.Duration(call.TimeoutMs) * time.Millisecond
	}
	return 30 * time.Second
}

func fromError(err error) Result {
	if err == nil {
		return Result{}
	}
	s, ok := status.FromError(err)
	if !ok {
		// kubelet's client wraps some errors (e.g. at connect); keep the status inside.
		s = status.Convert(err)
		return Result{Code: uint32(s.Code()), Message: err.Error()}
	}
	return Result{Code: uint32(s.Code()), Message: s.Message()}
}

func (d *driver) grpcConn() (*grpc.ClientConn, error) {
	if d.conn == nil {
		conn, err := grpc.NewClient("unix://"+d.socket,
			grpc.WithTransportCredentials(insecure.NewCredentials()),
			grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(maxMsg), grpc.MaxCallSendMsgSize(maxMsg)))
		if err != nil {
			return nil, err
		}
		d.conn = conn
	}
	return d.conn, nil
}

func (d *driver) grpcCall(call Call) Result {
	conn, err := d.grpcConn()
	if err != nil {
		return Result{Error: "grpc client: " + err.Error()}
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout(call))
	defer cancel()
	request := call.Request
	var response []byte
	err = conn.Invoke(ctx, service+call.Method, &request, &response, grpc.ForceCodec(rawCodec{}))
	result := fromError(err)
	if err == nil {
		result.Response = response
	}
	return result
}

// kubeletCall decodes the request, calls kubelet's client the way kubelet does, and encodes
// what it returns as the method's response message.
func (d *driver) kubeletCall(call Call) Result {
	if err := d.kubeletService(); err != nil {
		return fromError(err)
	}
	ctx := context.Background()
	var response proto.Message
	var err error
	switch call.Method {
	case "Version":
		var r runtimeapi.VersionRequest
		if err = proto.Unmarshal(call.Request, &r); err == nil {
			response, err = d.kubelet.Version(ctx, r.Version)
		}
	case "ListContainers":
		var r runtimeapi.ListContainersRequest
		if err = proto.Unmarshal(call.Request, &r); err == nil {
			var containers []*runtimeapi.Container
			containers, err = d.kubelet.ListContainers(ctx, r.Filter)
			response = &runtimeapi.ListContainersResponse{Containers: containers}
		}
	case "CreateContainer":
		var r runtimeapi.CreateContainerRequest
		if err = proto.Unmarshal(call.Request, &r); err == nil {
			var id string
			id, err = d.kubelet.CreateContainer(ctx, r.PodSandboxId, r.Config, r.SandboxConfig)
			response = &runtimeapi.CreateContainerResponse{ContainerId: id}
		}
	case "StartContainer":
		var r runtimeapi.StartContainerRequest
		if err = proto.Unmarshal(call.Request, &r); err == nil {
			err = d.kubelet.StartContainer(ctx, r.ContainerId)
			response = &runtimeapi.StartContainerResponse{}
		}
	case "StopContainer":
		var r runtimeapi.StopContainerRequest
		if err = proto.Unmarshal(call.Request, &r); err == nil {
			err = d.kubelet.StopContainer(ctx, r.ContainerId, r.Timeout)
			response = &runtimeapi.StopContainerResponse{}
		}
	case "ContainerStatus":
		var r runtimeapi.ContainerStatusRequest
		if err = proto.Unmarshal(call.Request, &r); err == nil {
			response, err = d.kubelet.ContainerStatus(ctx, r.ContainerId, r.Verbose)
		}
	case "ReopenContainerLog":
		var r runtimeapi.ReopenContainerLogRequest
		if err = proto.Unmarshal(call.Request, &r); err == nil {
			err = d.kubelet.ReopenContainerLog(ctx, r.ContainerId)
			response = &runtimeapi.ReopenContainerLogResponse{}
		}
	case "RemoveContainer":
		var r runtimeapi.RemoveContainerRequest
		if err = proto.Unmarshal(call.Request, &r); err == nil {
			err = d.kubelet.RemoveContainer(ctx, r.ContainerId)
			response = &runtimeapi.RemoveContainerResponse{}
		}
	default:
		return Result{Error: fmt.Sprintf("kubelet client: method %q not wired", call.Method)}
	}
	result := fromError(err)
	if err == nil {
		bytes, merr := proto.Marshal(response)
		if merr != nil {
			return Result{Error: "encode response: " + merr.Error()}
		}
		result.Response = bytes
	}
	return result
}

// kubeletService connects kubelet's client once, as kubelet 1.37 builds it (pkg/kubelet
// PreInitRuntimeService): its default tracer provider (a no-op one) and the list RPCs unary
// (feature gate CRIListStreaming, alpha, off by default).
func (d *driver) kubeletService() error {
	if d.kubelet != nil {
		return nil
	}
	service, err := remote.NewRemoteRuntimeServiceBuilder().
		WithEndpoint("unix://" + d.socket).
		WithConnectionTimeout(kubeletTO).
		WithUseStreaming(false).
		Build(context.Background())
	if err != nil {
		return err
	}
	d.kubelet = service
	return nil
}

// kubeletStreamStart runs kubelet's GetContainerEvents in the background until stream_end,
// keeping each event it hands over; it answers once the client says the stream is established.
func (d *driver) kubeletStreamStart(call Call) Result {
	if call.Method != "GetContainerEvents" {
		return Result{Error: fmt.Sprintf("kubelet client: stream %q not wired", call.Method)}
	}
	if err := d.kubeletService(); err != nil {
		return fromError(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout(call))
	s := &stream{done: make(chan struct{}), cancel: cancel}
	events := make(chan *runtimeapi.ContainerEventResponse)
	established := make(chan struct{})
	var callErr error
	go func() {
		callErr = d.kubelet.GetContainerEvents(ctx, events, func(runtimeapi.RuntimeService_GetContainerEventsClient) {
			close(established)
		})
		close(events)
	}()
	go func() {
		defer close(s.done)
		for event := range events {
			bytes, err := proto.Marshal(event)
			if err != nil {
				s.result.Error = "encode event: " + err.Error()
				continue
			}
			s.result.Responses = append(s.result.Responses, bytes)
		}
		status := fromError(callErr)
		s.result.Code, s.result.Message = status.Code, status.Message
	}()
	select {
	case <-established:
	case <-s.done:
	}
	// Established first, whatever came after: its status is stream_end's, as with grpc-go.
	select {
	case <-established:
		d.streams[call.Name] = s
		return Result{}
	default:
		cancel()
		return fromError(callErr)
	}
}

// streamStart opens a server stream and reads it in the background until stream_end; it
// answers once the stream is open (request sent).
func (d *driver) streamStart(call Call) Result {
	conn, err := d.grpcConn()
	if err != nil {
		return Result{Error: "grpc client: " + err.Error()}
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout(call))
	desc := &grpc.StreamDesc{ServerStreams: true}
	cs, err := conn.NewStream(ctx, desc, service+call.Method, grpc.ForceCodec(rawCodec{}))
	if err == nil {
		request := call.Request
		err = cs.SendMsg(&request)
	}
	if err == nil {
		err = cs.CloseSend()
	}
	if err != nil {
		cancel()
		return fromError(err)
	}
	s := &stream{done: make(chan struct{}), cancel: cancel}
	d.streams[call.Name] = s
	go func() {
		defer close(s.done)
		for {
			var message []byte
			if err := cs.RecvMsg(&message); err != nil {
				if err != io.EOF {
					// The status, keeping the messages received before it.
					status := fromError(err)
					s.result.Code, s.result.Message = status.Code, status.Message
				}
				return
			}
			s.result.Responses = append(s.result.Responses, message)
		}
	}()
	return Result{}
}

// stall opens a connection of its own with a `window`-byte flow-control window (stream and
// connection, no dynamic window), starts `count` calls and never reads their answers.
func (d *driver) stall(call Call) Result {
	window := call.Window
	if window == 0 {
		window = 64 << 10
	}
	conn, err := grpc.NewClient("unix://"+d.socket,
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithInitialWindowSize(window),
		grpc.WithInitialConnWindowSize(window),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(maxMsg)))
	if err != nil {
		return Result{Error: "grpc client: " + err.Error()}
	}
	d.stalled = append(d.stalled, conn)
	desc := &grpc.StreamDesc{ServerStreams: true}
	for i := 0; i < call.Count; i++ {
		cs, err := conn.NewStream(context.Background(), desc, service+call.Method, grpc.ForceCodec(rawCodec{}))
		if err == nil {
			request := call.Request
			err = cs.SendMsg(&request)
		}
		if err == nil {
			err = cs.CloseSend()
		}
		if err != nil {
			return fromError(err)
		}
		// Never RecvMsg: the stream's window fills and stays full.
	}
	return Result{}
}
