{{/* Chart name, overridable. */}}
{{- define "kubetune.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name prefix of every object: "<release>-kubetune", or the release name alone when it
already contains the chart name. Truncated to 63 characters (DNS label limit).
*/}}
{{- define "kubetune.fullname" -}}
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

{{/* "name-version" for the helm.sh/chart label. */}}
{{- define "kubetune.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels that select the operator pods (stable across upgrades). */}}
{{- define "kubetune.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kubetune.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{/* Labels on every object. */}}
{{- define "kubetune.labels" -}}
helm.sh/chart: {{ include "kubetune.chart" . }}
{{ include "kubetune.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: kubetune
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Name of the operator's ServiceAccount. */}}
{{- define "kubetune.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "kubetune.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
"repository@digest" when a digest is set, else "repository:tag" (tag defaults to appVersion).
A floating "latest" tag is refused: upgrades and rollbacks must know what they run.
*/}}
{{- define "kubetune.imageRef" -}}
{{- $image := .image }}
{{- if eq (toString $image.tag) "latest" }}
{{- fail (printf "%s.tag \"latest\" is not allowed: pin a version (or set %s.digest)" .key .key) }}
{{- end }}
{{- if $image.digest }}
{{- printf "%s@%s" $image.repository $image.digest }}
{{- else }}
{{- printf "%s:%s" $image.repository (default .appVersion $image.tag) }}
{{- end }}
{{- end }}

{{/* The operator image reference. */}}
{{- define "kubetune.operatorImage" -}}
{{- include "kubetune.imageRef" (dict "image" .Values.image "appVersion" .Chart.AppVersion "key" "image") }}
{{- end }}

{{/* The default trainer image reference. */}}
{{- define "kubetune.trainerImage" -}}
{{- include "kubetune.imageRef" (dict "image" .Values.trainer.image "appVersion" .Chart.AppVersion "key" "trainer.image") }}
{{- end }}

{{/* True ("true") in cluster-wide mode: no watchNamespaces listed. */}}
{{- define "kubetune.clusterWide" -}}
{{- if empty .Values.watchNamespaces }}true{{ end }}
{{- end }}

{{/*
Rules the operator needs inside every namespace it serves. In cluster-wide mode they go into
the ClusterRole; in namespace-scoped mode into a Role in each watched namespace.
*/}}
{{- define "kubetune.namespacedRules" -}}
# The FineTuneJob API: watch it, patch metadata (kopf finalizers/annotations); create a sweep's
# trials and set spec.cancel on the trials its pruner stops (the only spec the operator writes).
- apiGroups: ["kubetune.dev"]
  resources: ["finetunejobs"]
  verbs: ["get", "list", "watch", "patch", "create"]
- apiGroups: ["kubetune.dev"]
  resources: ["finetunejobs/status"]
  verbs: ["get", "patch"]
# Children carry blockOwnerDeletion owner references to their FineTuneJob; clusters with the
# OwnerReferencesPermissionEnforcement admission plugin (e.g. OpenShift) require this for that.
- apiGroups: ["kubetune.dev"]
  resources: ["finetunejobs/finalizers"]
  verbs: ["update"]
# The FineTuneSweep API: watch it, patch metadata (kopf annotations) and status; its trials carry
# blockOwnerDeletion owner references to it (hence finalizers, as for FineTuneJobs).
- apiGroups: ["kubetune.dev"]
  resources: ["finetunesweeps"]
  verbs: ["get", "list", "watch", "patch"]
- apiGroups: ["kubetune.dev"]
  resources: ["finetunesweeps/status"]
  verbs: ["get", "patch"]
- apiGroups: ["kubetune.dev"]
  resources: ["finetunesweeps/finalizers"]
  verbs: ["update"]
# The training run itself: watched for status, patched for suspend/resume and lifecycle limits,
# deleted (foreground, its pods first) only when its FineTuneJob is cancelled (spec.cancel).
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# Read-only pod state: phases, exit codes, termination messages, OOMKilled.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch"]
# Per-job trainer config (ConfigMap) and per-job identity (ServiceAccount): created once
# (get + create), never changed or deleted (the training definition is immutable; the GC
# deletes them with their FineTuneJob).
- apiGroups: [""]
  resources: ["configmaps", "serviceaccounts"]
  verbs: ["get", "create"]
# Per-job Role/RoleBinding that lets the trainer patch only its own FineTuneJob's status.
# No escalate/bind: the API server allows creating them because the operator itself holds
# every permission they grant (get finetunejobs, get/patch finetunejobs/status).
- apiGroups: ["rbac.authorization.k8s.io"]
  resources: ["roles", "rolebindings"]
  verbs: ["get", "create"]
# Per-job trainer NetworkPolicy (trainerNetworkPolicy.enabled): created once, deleted by the GC.
- apiGroups: ["networking.k8s.io"]
  resources: ["networkpolicies"]
  verbs: ["get", "create"]
# Kueue's Workload of a queued Job: spec.suspend sets its spec.active (Kueue owns the Job's
# spec.suspend). Harmless where Kueue is not installed.
- apiGroups: ["kueue.x-k8s.io"]
  resources: ["workloads"]
  verbs: ["list", "patch"]
# Kubernetes Events on phase transitions.
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- end }}
