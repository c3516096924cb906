// Command controller runs cert-manager's control loops for the issuers a dkv cluster uses:
// SelfSigned and CA Issuers/ClusterIssuers, Certificates (trigger, key manager, request
// manager, issuing, readiness, revision manager, metrics), CertificateRequests (approver and
// the CA and SelfSigned signers) and the ingress shim.
//
// cert-manager's own command is a nested Go module that the module proxy does not serve, so
// this main package wires the exported packages of github.com/cert-manager/cert-manager
// itself: the controllers register themselves with pkg/controller when imported (below), and
// pkg/controller's ContextFactory gives them clients and shared informers. ACME, Vault and
// Venafi are left out (no such issuer is reachable from a cluster built on this machine, and
// their SDKs would double the build); an Issuer of those kinds is reported as unsupported.
//
// The flags keep the names of cert-manager's controller, so the Deployment its Helm chart
// renders runs this binary unchanged; flags of the left-out parts are accepted and ignored.
package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/signal"
	"slices"
	"sort"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/pflag"
	"golang.org/x/sync/errgroup"
	"k8s.io/client-go/tools/leaderelection"
	"k8s.io/client-go/tools/leaderelection/resourcelock"
	cliflag "k8s.io/component-base/cli/flag"
	logsapi "k8s.io/component-base/logs/api/v1"

	cmapi "github.com/cert-manager/cert-manager/pkg/apis/certmanager"
	"github.com/cert-manager/cert-manager/pkg/controller"
	"github.com/cert-manager/cert-manager/pkg/controller/clusterissuers"
	"github.com/cert-manager/cert-manager/pkg/healthz"
	logf "github.com/cert-manager/cert-manager/pkg/logs"
	"github.com/cert-manager/cert-manager/pkg/util"
	utilfeature "github.com/cert-manager/cert-manager/pkg/util/feature"

	// Each of these registers its control loop(s) with pkg/controller when imported.
	_ "github.com/cert-manager/cert-manager/pkg/controller/certificate-shim/ingresses"
	_ "github.com/cert-manager/cert-manager/pkg/controller/certificaterequests/approver"
	_ "github.com/cert-manager/cert-manager/pkg/controller/certificaterequests/ca"
	_ "github.com/cert-manager/cert-manager/pkg/controller/certificaterequests/selfsigned"
	_ "github.com/cert-manager/cert-manager/pkg/controller/certificates/issuing"
	_ "github.com/cert-manager/cert-manager/pkg/controller/certificates/keymanager"
	_ "github.com/cert-manager/cert-manager/pkg/controller/certificates/metrics"
	_ "github.com/cert-manager/cert-manager/pkg/controller/certificates/readiness"
	_ "github.com/cert-manager/cert-manager/pkg/controller/certificates/requestmanager"
	_ "github.com/cert-manager/cert-manager/pkg/controller/certificates/revisionmanager"
	_ "github.com/cert-manager/cert-manager/pkg/controller/certificates/trigger"
	_ "github.com/cert-manager/cert-manager/pkg/controller/issuers"
	// The issuer kinds the issuers controllers know how to set up (Ready condition).
	_ "github.com/cert-manager/cert-manager/pkg/issuer/ca"
	_ "github.com/cert-manager/cert-manager/pkg/issuer/selfsigned"
)

// settings holds every flag's value.
type settings struct {
	master, kubeconfig        string
	apiQPS                    float32
	apiBurst                  int
	namespace, clusterResNS   string
	controllers               []string
	workers                   int
	leaderElect               bool
	leaderNS                  string
	leaseDuration, renewDL    time.Duration
	retryPeriod, healthzGrace time.Duration
	metricsAddr, healthzAddr  string
	clusterIssuerAmbient      bool
	issuerAmbient             bool
	ownerRef                  bool
	copiedAnnotationPrefixes  []string
	autoCertAnnotations       []string
	defaultIssuerName         string
	defaultIssuerKind         string
	defaultIssuerGroup        string
	featureGates              map[string]bool
	printVersion              bool
	logging                   *logsapi.LoggingConfiguration
	ignoredString             string
	ignoredInt                int
	ignoredStrings            []string
}

func newFlags(s *settings) *pflag.FlagSet {
	fs := pflag.NewFlagSet("controller", pflag.ContinueOnError)
	fs.StringVar(&s.master, "master", "", "API server address (default: from the kubeconfig or the pod's service account)")
	fs.StringVar(&s.kubeconfig, "kubeconfig", "", "kubeconfig file; empty: in-cluster configuration")
	fs.Float32Var(&s.apiQPS, "kube-api-qps", 20, "queries per second to the API server")
	fs.IntVar(&s.apiBurst, "kube-api-burst", 50, "burst of queries to the API server")
	fs.StringVar(&s.namespace, "namespace", "", "watch only this namespace (ClusterIssuers are then disabled); empty: all")
	fs.StringVar(&s.clusterResNS, "cluster-resource-namespace", "kube-system", "namespace of the Secrets that ClusterIssuers refer to")
	fs.StringSliceVar(&s.controllers, "controllers", []string{"*"},
		"controllers to run: '*' all, 'name' one, '-name' all but that one; known: "+strings.Join(knownControllers(), ", "))
	fs.IntVar(&s.workers, "concurrent-workers", 5, "workers per controller")
	fs.BoolVar(&s.leaderElect, "leader-elect", true, "hold the cert-manager-controller Lease before running the controllers")
	fs.StringVar(&s.leaderNS, "leader-election-namespace", "kube-system", "namespace of the Lease")
	fs.DurationVar(&s.leaseDuration, "leader-election-lease-duration", 60*time.Second, "Lease duration")
	fs.DurationVar(&s.renewDL, "leader-election-renew-deadline", 40*time.Second, "how long the leader keeps trying to renew")
	fs.DurationVar(&s.retryPeriod, "leader-election-retry-period", 15*time.Second, "interval between attempts to acquire or renew")
	fs.DurationVar(&s.healthzGrace, "internal-healthz-leader-election-timeout", 20*time.Second, "/livez stays healthy this long after the Lease expired")
	fs.StringVar(&s.metricsAddr, "metrics-listen-address", "0.0.0.0:9402", "address of the Prometheus metrics endpoint (/metrics, plain HTTP)")
	fs.StringVar(&s.healthzAddr, "internal-healthz-listen-address", "0.0.0.0:9403", "address of the liveness endpoint (/livez)")
	fs.BoolVar(&s.clusterIssuerAmbient, "cluster-issuer-ambient-credentials", true, "ClusterIssuers may use ambient credentials")
	fs.BoolVar(&s.issuerAmbient, "issuer-ambient-credentials", false, "Issuers may use ambient credentials")
	fs.BoolVar(&s.ownerRef, "enable-certificate-owner-ref", false, "make each Certificate the owner of its Secret (deleted with it)")
	fs.StringSliceVar(&s.copiedAnnotationPrefixes, "copied-annotation-prefixes",
		[]string{"*", "-kubectl.kubernetes.io/", "-fluxcd.io/", "-argocd.argoproj.io/"},
		"annotation prefixes copied from a Certificate to its CertificateRequests ('-' excludes)")
	fs.StringSliceVar(&s.autoCertAnnotations, "auto-certificate-annotations", []string{"kubernetes.io/tls-acme"},
		"ingress annotations that ask the ingress shim for a certificate")
	fs.StringVar(&s.defaultIssuerName, "default-issuer-name", "", "ingress shim: issuer when an ingress names none")
	fs.StringVar(&s.defaultIssuerKind, "default-issuer-kind", "Issuer", "ingress shim: kind of that issuer")
	fs.StringVar(&s.defaultIssuerGroup, "default-issuer-group", cmapi.GroupName, "ingress shim: group of that issuer")
	fs.Var(cliflag.NewMapStringBool(&s.featureGates), "feature-gates",
		"feature gates, key=true|false,...; known:\n"+strings.Join(utilfeature.DefaultFeatureGate.KnownFeatures(), "\n"))
	fs.BoolVar(&s.printVersion, "version", false, "print the version and exit")

	// Flags of cert-manager's parts left out of this build (ACME): accepted, so its chart's
	// arguments work, and ignored.
	for _, name := range []string{"acme-http01-solver-image", "acme-http01-solver-resource-request-cpu",
		"acme-http01-solver-resource-request-memory", "acme-http01-solver-resource-limits-cpu",
		"acme-http01-solver-resource-limits-memory", "dns01-check-retry-period"} {
		fs.StringVar(&s.ignoredString, name, "", "ignored: no ACME in this build")
	}
	fs.IntVar(&s.ignoredInt, "max-concurrent-challenges", 60, "ignored: no ACME in this build")
	fs.StringSliceVar(&s.ignoredStrings, "dns01-recursive-nameservers", nil, "ignored: no ACME in this build")

	s.logging = logsapi.NewLoggingConfiguration()
	logf.AddFlags(s.logging, fs)
	return fs
}

// knownControllers lists the controllers compiled into this binary.
func knownControllers() []string {
	names := make([]string, 0, len(controller.Known()))
	for n := range controller.Known() {
		names = append(names, n)
	}
	sort.Strings(names)
	return names
}

// enabledControllers applies --controllers ('*', 'name', '-name') to the compiled-in set.
func enabledControllers(s *settings) ([]string, error) {
	known := knownControllers()
	enabled := map[string]bool{}
	var disabled []string
	for _, c := range s.controllers {
		switch {
		case c == "*":
			for _, n := range known {
				enabled[n] = true
			}
		case strings.HasPrefix(c, "-"):
			disabled = append(disabled, strings.TrimPrefix(c, "-"))
		default:
			enabled[c] = true
		}
	}
	if len(enabled) == 0 && len(disabled) > 0 {
		for _, n := range known {
			enabled[n] = true
		}
	}
	for _, n := range disabled {
		delete(enabled, n)
	}
	if s.namespace != "" {
		delete(enabled, clusterissuers.ControllerName)
	}
	var out []string
	for n := range enabled {
		if !slices.Contains(known, n) {
			return nil, fmt.Errorf("unknown controller %q (known: %s)", n, strings.Join(known, ", "))
		}
		out = append(out, n)
	}
	sort.Strings(out)
	return out, nil
}

func main() {
	os.Exit(run(os.Args[1:]))
}

func run(args []string) int {
	logf.InitLogs()
	defer logf.FlushLogs()

	s := &settings{}
	fs := newFlags(s)
	fs.Usage = func() {
		fmt.Fprintf(os.Stderr, "cert-manager controller %s (dkv build): issues Certificates with SelfSigned and CA issuers.\n\nFlags:\n%s",
			util.AppVersion, fs.FlagUsages())
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, pflag.ErrHelp) {
			return 0
		}
		fmt.Fprintln(os.Stderr, "controller:", err)
		return 2
	}
	if s.printVersion {
		v := util.VersionInfo()
		fmt.Printf("cert-manager controller %s (commit %s, %s, %s)\n", v.GitVersion, v.GitCommit, v.GoVersion, v.Platform)
		return 0
	}
	if err := utilfeature.DefaultMutableFeatureGate.SetFromMap(s.featureGates); err != nil {
		fmt.Fprintln(os.Stderr, "controller: --feature-gates:", err)
		return 2
	}
	if err := logf.ValidateAndApply(s.logging); err != nil {
		fmt.Fprintln(os.Stderr, "controller: logging flags:", err)
		return 2
	}
	names, err := enabledControllers(s)
	if err != nil {
		fmt.Fprintln(os.Stderr, "controller:", err)
		return 2
	}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	ctx = logf.NewContext(ctx, logf.Log, "controller")
	if err := serve(ctx, s, names); err != nil {
		logf.FromContext(ctx).Error(err, "controller stopped")
		return 1
	}
	return 0
}

// serve runs the metrics and health endpoints, then (once leader, when electing) every
// enabled controller, until ctx ends or one of them fails.
func serve(ctx context.Context, s *settings, names []string) error {
	log := logf.FromContext(ctx)
	v := util.VersionInfo()
	log.Info("starting cert-manager controller (dkv build)", "version", v.GitVersion, "go_version", v.GoVersion)

	factory, err := controller.NewContextFactory(ctx, controller.ContextOptions{
		APIServerHost:      s.master,
		Kubeconfig:         s.kubeconfig,
		KubernetesAPIQPS:   s.apiQPS,
		KubernetesAPIBurst: s.apiBurst,
		Namespace:          s.namespace,
		IssuerOptions: controller.IssuerOptions{
			ClusterResourceNamespace:        s.clusterResNS,
			ClusterIssuerAmbientCredentials: s.clusterIssuerAmbient,
			IssuerAmbientCredentials:        s.issuerAmbient,
		},
		IngressShimOptions: controller.IngressShimOptions{
			DefaultIssuerName:                 s.defaultIssuerName,
			DefaultIssuerKind:                 s.defaultIssuerKind,
			DefaultIssuerGroup:                s.defaultIssuerGroup,
			DefaultAutoCertificateAnnotations: s.autoCertAnnotations,
		},
		CertificateOptions: controller.CertificateOptions{
			EnableOwnerRef:           s.ownerRef,
			CopiedAnnotationPrefixes: s.copiedAnnotationPrefixes,
		},
		SchedulerOptions: controller.SchedulerOptions{MaxConcurrentChallenges: 1},
	})
	if err != nil {
		return err
	}
	base, err := factory.Build()
	if err != nil {
		return err
	}
	log.Info("enabled controllers", "controllers", strings.Join(names, ","))

	parent := ctx
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	g, ctx := errgroup.WithContext(ctx)

	lc := net.ListenConfig{}
	metricsLn, err := lc.Listen(ctx, "tcp", s.metricsAddr)
	if err != nil {
		return fmt.Errorf("metrics address %s: %w", s.metricsAddr, err)
	}
	base.Metrics.SetupCertificateCollector(base.SharedInformerFactory.Certmanager().V1().Certificates().Lister())
	metricsSrv := base.Metrics.NewServer(metricsLn)
	g.Go(func() error {
		if err := metricsSrv.Serve(metricsLn); !errors.Is(err, http.ErrServerClosed) {
			return err
		}
		return nil
	})
	g.Go(func() error {
		<-ctx.Done()
		shutdown, done := context.WithTimeout(context.Background(), 5*time.Second)
		defer done()
		return metricsSrv.Shutdown(shutdown) //nolint:contextcheck // ctx is already over
	})

	healthLn, err := lc.Listen(ctx, "tcp", s.healthzAddr)
	if err != nil {
		return fmt.Errorf("healthz address %s: %w", s.healthzAddr, err)
	}
	health := healthz.NewServer(s.healthzGrace)
	g.Go(func() error { return health.Start(ctx, healthLn) })

	leading := make(chan struct{})
	lost := make(chan struct{})
	if s.leaderElect {
		elector, err := newElector(factory, s, health, leading, func() {
			if parent.Err() == nil { // not a shutdown: the Lease was lost
				close(lost)
			}
			cancel()
		})
		if err != nil {
			return err
		}
		g.Go(func() error {
			elector.Run(ctx)
			return nil
		})
	} else {
		close(leading)
	}

	select {
	case <-ctx.Done():
		err := g.Wait()
		select {
		case <-lost:
			return errors.Join(errors.New("lost the leader election Lease"), err)
		default:
			return err
		}
	case <-leading:
	}

	for _, name := range names {
		loop, err := controller.Known()[name](factory)
		if err != nil {
			cancel()
			_ = g.Wait()
			return fmt.Errorf("controller %s: %w", name, err)
		}
		log.V(logf.InfoLevel).Info("starting controller", "controller", name)
		g.Go(func() error { return loop.Run(s.workers, ctx) })
	}
	base.SharedInformerFactory.Start(ctx.Done())
	base.KubeSharedInformerFactory.Start(ctx.Done())
	base.HTTP01ResourceMetadataInformersFactory.Start(ctx.Done())

	err = g.Wait()
	base.HTTP01ResourceMetadataInformersFactory.Shutdown()
	base.KubeSharedInformerFactory.Shutdown()
	base.SharedInformerFactory.Shutdown()
	select {
	case <-lost:
		return errors.Join(errors.New("lost the leader election Lease"), err)
	default:
		return err
	}
}

// newElector: a Lease named cert-manager-controller in --leader-election-namespace; leading
// is closed once held, and stopped is called when it is no longer held (lost, or released on
// shutdown). Losing it stops the process with an error, as a second leader must not run
// beside a stale one; the pod is then restarted.
func newElector(factory *controller.ContextFactory, s *settings, health *healthz.Server,
	leading chan struct{}, stopped func()) (*leaderelection.LeaderElector, error) {
	lectx, err := factory.Build("leader-election")
	if err != nil {
		return nil, err
	}
	host, err := os.Hostname()
	if err != nil {
		return nil, err
	}
	lock, err := resourcelock.New(resourcelock.LeasesResourceLock, s.leaderNS, "cert-manager-controller",
		lectx.Client.CoreV1(), lectx.Client.CoordinationV1(),
		resourcelock.ResourceLockConfig{Identity: host + "-external-cert-manager-controller", EventRecorder: lectx.Recorder})
	if err != nil {
		return nil, fmt.Errorf("leader election lock: %w", err)
	}
	return leaderelection.NewLeaderElector(leaderelection.LeaderElectionConfig{
		Lock:            lock,
		LeaseDuration:   s.leaseDuration,
		RenewDeadline:   s.renewDL,
		RetryPeriod:     s.retryPeriod,
		ReleaseOnCancel: true,
		WatchDog:        health.LeaderHealthzAdaptor,
		Callbacks: leaderelection.LeaderCallbacks{
			OnStartedLeading: func(context.Context) { close(leading) },
			OnStoppedLeading: stopped,
		},
	})
}
