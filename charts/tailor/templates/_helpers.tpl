{{/* Names, labels and images shared by every template. */}}

{{- define "tailor.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "tailor.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "tailor.namespace" -}}
{{- default .Release.Namespace .Values.namespaceOverride }}
{{- end }}

{{- define "tailor.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of every object of the release. */}}
{{- define "tailor.labels" -}}
helm.sh/chart: {{ include "tailor.chart" . }}
{{ include "tailor.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: tailor
{{- end }}

{{- define "tailor.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tailor.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "tailor.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "tailor.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* No registry publishes Tailor's images: they are built with `make images` and pushed
     to the user's own registry, which these values name. */}}
{{- define "tailor.buildHint" -}}
build and push the images first (make images PUSH=registry.example.com/team; see the README's install section), then set
{{- end }}

{{- define "tailor.image" -}}
{{- $repository := required (printf "image.repository is required: %s image.repository=registry.example.com/team/tailor-operator" (include "tailor.buildHint" .)) .Values.image.repository }}
{{- printf "%s:%s" $repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "tailor.workloadsRepository" -}}
{{- required (printf "workloads.image.repository is required: %s workloads.image.repository=registry.example.com/team/tailor-workloads" (include "tailor.buildHint" .)) .Values.workloads.image.repository }}
{{- end }}

{{/* The workload image: <repository>:<tag>, with -cuda for the CUDA variant. */}}
{{- define "tailor.workloadsImage" -}}
{{- $image := .Values.workloads.image }}
{{- $tag := default .Chart.AppVersion $image.tag }}
{{- if eq $image.variant "cuda" }}{{ $tag = printf "%s-cuda" $tag }}{{ end }}
{{- printf "%s:%s" (include "tailor.workloadsRepository" .) $tag }}
{{- end }}

{{/* The workload image of pods that request GPUs: always the CUDA variant. */}}
{{- define "tailor.workloadsGpuImage" -}}
{{- $image := .Values.workloads.image }}
{{- printf "%s:%s-cuda" (include "tailor.workloadsRepository" .) (default .Chart.AppVersion $image.tag) }}
{{- end }}

{{- define "tailor.qdrant.fullname" -}}
{{- printf "%s-qdrant" (include "tailor.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "tailor.qdrant.selectorLabels" -}}
{{ include "tailor.selectorLabels" . }}
app.kubernetes.io/component: qdrant
{{- end }}

{{- define "tailor.qdrant.secretName" -}}
{{- default (include "tailor.qdrant.fullname" .) .Values.qdrant.apiKey.existingSecret }}
{{- end }}

{{/* The namespaces the operator watches, as a JSON list: watchNamespaces, else the
release namespace; empty in cluster-wide mode (clusterWide: every namespace but
excludedNamespaces). Fails when a watched namespace is an excluded one. */}}
{{- define "tailor.watchNamespaces" -}}
{{- $watch := list }}
{{- if not .Values.clusterWide }}
{{- $watch = .Values.watchNamespaces | default (list (include "tailor.namespace" .)) }}
{{- end }}
{{- range $watch }}
{{- if has . $.Values.excludedNamespaces }}
{{- fail (printf "watchNamespaces (or the release namespace) includes %s, which excludedNamespaces excludes" .) }}
{{- end }}
{{- end }}
{{- toJson $watch }}
{{- end }}

{{/* The namespaces the PodMonitors look in: the watched ones, else all. */}}
{{- define "tailor.podMonitorNamespaces" -}}
{{- $watch := include "tailor.watchNamespaces" . | fromJsonArray }}
{{- if $watch -}}
matchNames:
{{- range $watch }}
- {{ . | quote }}
{{- end }}
{{- else -}}
any: true
{{- end }}
{{- end }}
