// The dev cluster's dynamic provisioner: PersistentVolumes for claims of the
// "tailor-hostpath" StorageClass, each a directory under -dir on this host.
//
// The controller (watching claims, provisioning once, binding, deleting
// released volumes, leader election off: one instance) is the Kubernetes
// SIG Storage library sigs.k8s.io/sig-storage-lib-external-provisioner; this
// file only says where a volume lives, as the library's own
// examples/hostpath-provisioner does, with a kubeconfig instead of the
// in-cluster config and the directory as a flag.
package main

import (
	"context"
	"errors"
	"flag"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"

	v1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/klog/v2"
	"sigs.k8s.io/sig-storage-lib-external-provisioner/v13/controller"
)

const identityAnnotation = "tailor.dev/hostpath-provisioner"

type hostPath struct {
	dir      string
	identity string
}

func (p *hostPath) Provision(ctx context.Context, options controller.ProvisionOptions) (*v1.PersistentVolume, controller.ProvisioningState, error) {
	path := filepath.Join(p.dir, options.PVName)
	if err := os.MkdirAll(path, 0o777); err != nil {
		return nil, controller.ProvisioningFinished, err
	}
	reclaim := v1.PersistentVolumeReclaimDelete
	if options.StorageClass.ReclaimPolicy != nil {
		reclaim = *options.StorageClass.ReclaimPolicy
	}
	return &v1.PersistentVolume{
		ObjectMeta: metav1.ObjectMeta{
			Name:        options.PVName,
			Annotations: map[string]string{identityAnnotation: p.identity},
		},
		Spec: v1.PersistentVolumeSpec{
			PersistentVolumeReclaimPolicy: reclaim,
			AccessModes:                   options.PVC.Spec.AccessModes,
			Capacity: v1.ResourceList{
				v1.ResourceStorage: options.PVC.Spec.Resources.Requests[v1.ResourceStorage],
			},
			PersistentVolumeSource: v1.PersistentVolumeSource{
				HostPath: &v1.HostPathVolumeSource{Path: path},
			},
		},
	}, controller.ProvisioningFinished, nil
}

func (p *hostPath) Delete(ctx context.Context, volume *v1.PersistentVolume) error {
	if volume.Annotations[identityAnnotation] != p.identity {
		return &controller.IgnoredError{Reason: "the volume was provisioned by another instance"}
	}
	if volume.Spec.HostPath == nil {
		return errors.New("not a hostPath volume")
	}
	return os.RemoveAll(filepath.Join(p.dir, volume.Name))
}

func main() {
	kubeconfig := flag.String("kubeconfig", "", "kubeconfig of the cluster")
	dir := flag.String("dir", "", "where volumes are created")
	name := flag.String("provisioner", "tailor.dev/hostpath", "provisioner name of the StorageClass")
	identity := flag.String("identity", "dev-cluster", "marks the volumes this instance deletes")
	metricsPort := flag.Int("metrics-port", 0, "serve Prometheus metrics on 127.0.0.1:<port> (0: off)")
	klog.InitFlags(nil)
	flag.Parse()
	logger := klog.Background()
	if *kubeconfig == "" || *dir == "" {
		logger.Error(nil, "-kubeconfig and -dir are required")
		os.Exit(2)
	}
	config, err := clientcmd.BuildConfigFromFlags("", *kubeconfig)
	if err != nil {
		logger.Error(err, "cannot read the kubeconfig")
		os.Exit(1)
	}
	client, err := kubernetes.NewForConfig(config)
	if err != nil {
		logger.Error(err, "cannot create a client")
		os.Exit(1)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	syscall.Umask(0)
	controller.NewProvisionController(
		ctx, client, *name, &hostPath{dir: *dir, identity: *identity},
		controller.LeaderElection(false),
		controller.MetricsAddress("127.0.0.1"),
		controller.MetricsPort(int32(*metricsPort)),
	).Run(ctx)
}
